"""The review queue: pairs worth a reviewer's time, leased so two reviewers never judge the same one."""
