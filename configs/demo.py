"""Demo: the whole CASS pipeline on synthetic MRI-like phantoms with tiny arms, in minutes on a laptop CPU.

python main.py --config=configs/demo.py --workdir=runs/demo
"""

from configs.common import base_config, tiny_arms


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    tiny_arms(c, image_size=128)
    c.data.source = "synthetic"
    c.data.synthetic_num_images = 320
    c.batch_size = 16
    c.num_epochs = 4
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.downstream.label_fractions = (1.0, 0.1)
    c.downstream.seeds = (0, 1)
    c.downstream.max_epochs = 3
    return c
