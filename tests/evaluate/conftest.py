"""A demo workspace fine-tuned with a tiny model built in the test, shared by the evaluate tests."""

import json
import shutil

import pytest

from slmconvert.workspace import Workspace
from tests.conftest import stage_config, tiny_model_folder

SETS = ["finetune.max_steps=2", "finetune.batch_size=4", "finetune.max_length=512", "finetune.max_train_examples=8",
        "evaluate.max_test_examples=6", "evaluate.max_new_tokens=8", "evaluate.batch_size=4", "evaluate.max_prompt_tokens=512"]


@pytest.fixture(scope="session")
def tuned_ws(clustered_demo, tmp_path_factory):
    from slmconvert.finetune.stage import run

    root = tmp_path_factory.mktemp("eval")
    ws = root / "ws"
    shutil.copytree(clustered_demo[0], ws)
    folder = tiny_model_folder(root / "tiny-base")
    cfg = stage_config(ws, f"finetune.models=[{folder}]", *SETS)
    run(cfg, Workspace(ws))
    return ws, cfg


def copy_ws(tuned_ws, tmp_path, *sets):
    ws = tmp_path / "ws"
    shutil.copytree(tuned_ws[0], ws)
    return ws, stage_config(ws, f"finetune.models={json.dumps(tuned_ws[1].finetune.models)}", *SETS, *sets)
