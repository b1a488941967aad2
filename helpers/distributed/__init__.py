"""The multi-process runtime of lesson 09: `launch` starts torchrun/accelerate/deepspeed runs of `worker`."""
