"""OBS solvers: layer-wise (OBC exact, SparseGPT fast), block Fisher (WoodFisher), K-FAC."""
