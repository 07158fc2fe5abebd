"""nemotron3: the Nemotron 3 recipe (hybrid Mamba-2 + attention LatentMoE with MTP) in pure PyTorch."""
