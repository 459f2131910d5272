"""
Checkpoint loading for hxa079 models (HF layout).

    config, state_dict = load_checkpoint("path/to/HRWKV7-dir")
"""
import json
import os

from safetensors.torch import load_file

from hrwkv7_ref import HRWKV7Config


def load_checkpoint(path, config=None):
    """(HRWKV7Config, state_dict) from an HF directory: config.json + model.safetensors,
    or a sharded model.safetensors.index.json."""
    cfg_path = os.path.join(path, "config.json")
    if config is None:
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found")
        config = HRWKV7Config.from_json(cfg_path)
    elif isinstance(config, dict):
        config = HRWKV7Config.from_dict(config)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return config, load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(load_file(os.path.join(path, shard)))
        return config, state_dict
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
