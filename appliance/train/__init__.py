"""Training on vault data: tokenizers first; model stages build on them."""
