"""4-bit NormalFloat (NF4) storage of base weights."""
