"""The network for tabular binary classification: categorical embeddings + numeric features,
an MLP of configurable width and depth, one logit out."""
from __future__ import annotations

import torch
from torch import nn


class TabularNet(nn.Module):
    def __init__(self, numeric_width: int, cardinalities: list[int], embedding_dim: int = 4,
                 hidden: int = 64, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        width = numeric_width + embedding_dim * len(cardinalities)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [numeric] + [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)
