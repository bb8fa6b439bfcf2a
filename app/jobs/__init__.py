"""Jobs: fine-tunes, evaluations, reindexes and checkpoint validations, run by the GPU worker."""
