"""Face crops: upload (deduplicated by content), read, list and erase."""
