"""Jobs: the state machine and its transactions (job/core.py, job/txn.py), the block-job layer
(job/blockjob.py) and the job types built on them."""
