import torch

# Two cores: one torch thread per process avoids oversubscription with env subprocesses and parallel test workers.
torch.set_num_threads(1)
