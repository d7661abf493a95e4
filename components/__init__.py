"""KFP components: one module per lifecycle stage, each a thin wrapper over plain Python."""
