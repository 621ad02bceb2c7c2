"""Methods run end to end: runs (run_method), the base model, the offline demo base (pretrain), search and its
study, the report."""
