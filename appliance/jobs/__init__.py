"""Jobs: long work (training, quantizing, evaluating) queued in the vault and run by detached processes.

A job outlives whoever submitted it: the console can close, the shell can exit, and the job goes on; the
next `appliance jobs list` or console finds it again. `queue` keeps the rows, `dispatch` hands out the
box's GPUs and starts runners, `runner` is the process that does one job, `log` its sealed log.
"""
