"""Same/different judgements on pairs of faces: the training and evaluation signal."""
