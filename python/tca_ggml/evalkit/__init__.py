"""Pieces of `tca-ggml eval` (see tca_ggml.evaluate): RULER's own generators and scorer
(ruler), the dense-arm cache (cache), haystacks (haystacks)."""
