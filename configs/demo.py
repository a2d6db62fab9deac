"""Demo: the whole pipeline on synthetic MRI-like phantoms with tiny random arms, in minutes on a laptop CPU.

python main.py --config=configs/demo.py --workdir=runs/demo                 CASS, about 2 minutes on 2 cores
python main.py --config=configs/demo.py --config.methods=cass,dino,barlow_twins --workdir=runs/demo_methods
    the three methods against no pretraining, about 6 minutes on 2 cores
The phantoms' lesions are brighter and larger than the default's (data.synthetic_contrast, synthetic_lesion_scale)
and the images small (64 px), so the fine-tuned arms learn the classes within the budget and the rows can differ.
"""

from configs.common import base_config, tiny_arms


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    tiny_arms(c, image_size=64)
    c.data.source = "synthetic"
    c.data.synthetic_num_images = 640
    c.data.synthetic_size = 64
    c.data.synthetic_contrast = 3.0
    c.data.synthetic_lesion_scale = 2.0
    c.batch_size = 16
    c.num_epochs = 4
    c.log_every_steps = 32
    c.checkpoint_every_steps = 1000
    d = c.downstream
    d.label_fractions = (1.0, 0.1)
    d.seeds = (0, 1)
    # Ten epochs of small batches at a higher rate than the papers' 3e-4: what tiny random arms need to learn here.
    d.max_epochs = 10
    d.batch_size = 8
    d.lr = 1e-3
    # The phantoms' classes are balanced; the paper's min-max weights would turn a count difference of one or two
    # images into weights from 0.2 to 1.
    d.class_weights = "inverse"
    return c
