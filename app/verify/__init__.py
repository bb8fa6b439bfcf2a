"""1:1 verification: are two faces, or a face and a subject's faces, one person under the serving model."""
