"""
Train notebook 05's students for several seeds and write radlads_seeds.json (the error bars of notebook 05).

    python radlads_seeds.py [--seeds 0 1 2 3 4]        # about 2 minutes a seed on one core

The recipe is written once, in the cells of 05_radlads_distillation.ipynb tagged "recipe" (the conversion, the
three stages, the causal tests), with the training loop and hooks they import from nbhelpers.py. This script runs
those cells, then `run_seed(seed)` for each seed: the student's
initialisation (`init_from_teacher(seed=seed)`) and its training batches change with the seed, the teacher
(mqar_teacher/) and the held-out sets do not. The notebook trains seed 0 live and checks that its numbers equal
this file's seed-0 entry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "05_radlads_distillation.ipynb")
OUT = os.path.join(HERE, "radlads_seeds.json")


def recipe_namespace() -> dict:
    """Execute the notebook's cells tagged "recipe", in order, in a fresh namespace, and return it."""
    sys.path[:0] = [os.path.dirname(HERE), HERE]       # the project root, and this folder (radlads_teacher)
    os.chdir(HERE)
    cells = json.load(open(NOTEBOOK))["cells"]
    ns = {"__name__": "radlads_recipe"}
    for cell in cells:
        if cell["cell_type"] == "code" and "recipe" in cell.get("metadata", {}).get("tags", []):
            exec(compile("".join(cell["source"]), NOTEBOOK, "exec"), ns)
    return ns


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="notebook 05's students over several seeds -> radlads_seeds.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    ns = recipe_namespace()
    torch = ns["torch"]
    result = {"about": "notebook 05's metrics per student seed (recall: fraction of answers right); "
                       "written by radlads_seeds.py", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "seeds": {}}
    for seed in args.seeds:
        t0 = time.perf_counter()
        result["seeds"][str(seed)] = ns["run_seed"](seed)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("written:", args.out)
