"""Self-supervised pretraining methods: what differs between CASS, DINO, Barlow Twins (state, loss, export).

`cass`, `dino` and `barlow_twins` each build a `base.Method` that `cass_jax.pretrain` runs; each `<method>_parts`
module holds one method's pure, tested building blocks (heads, losses, schedules).
"""
