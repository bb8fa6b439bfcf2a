"""What a dashboard shows about the data, the jobs and the model in service."""
