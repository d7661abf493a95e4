"""Layer 2, the model: network (torch), preprocessing, label mapping, the torch-free artifact format
and its torch loader, and the MLflow pyfunc that registered versions are loaded through."""
