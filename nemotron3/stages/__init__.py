"""The commands' entry points: each module holds one stage's config (its flags) and its function.

`nemotron3 pretrain` is `stages.pretrain.pretrain(PretrainConfig)`, and so on; `nemotron3/cli.py` imports a stage only
when its command runs, so `nemotron3 info` does not pay for the training stack.
"""
