"""A tiny distributed training loop that logs through ranklog (``make demo``).

Run it under torchrun::

    torchrun --standalone --nproc-per-node 2 -m ranklog.demo --output_dir demo-output
"""
