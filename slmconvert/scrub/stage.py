"""`slmconvert scrub`: scrub an existing workspace's invocations into scrubbed/.

`collect` scrubs inline by default, so this stage is for workspaces collected with
`--no-scrub`, or for re-scrubbing with another policy. Later stages read scrubbed/ when it
exists and is up to date with invocations/.
"""

from __future__ import annotations

import json

from slmconvert.collect.tools import toolset_key
from slmconvert.config import PipelineConfig
from slmconvert.io import sha256_obj, write_json_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.store import SHARD_PATTERNS, TOOLS_FILE, load_invocations, next_shard_no, write_shards
from slmconvert.workspace import Manifest, Timer, Workspace

STAGE = "scrub"
REPORT_FILE = "scrub_report.json"


def run(config: PipelineConfig, workspace: Workspace, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> Manifest:
    from slmconvert.scrub.engine import scrub_invocations
    from slmconvert.scrub.policy import load_policy

    timer = Timer()
    sc = config.scrub
    policy = load_policy(sc.policy)
    config_hash = sha256_obj({"scrub": sc.model_dump(mode="json", exclude={"batch_size", "n_process", "enabled"}),
                              "policy": policy.model_dump(mode="json")})
    with workspace.lock():
        cm = workspace.require_manifest("collect", "scrub")
        input_hash = cm.fingerprint()
        prev = workspace.previous(STAGE, force)
        if workspace.unchanged(prev, config_hash, input_hash, force):
            return prev
        workspace.remove_unlisted(STAGE, prev, SHARD_PATTERNS)
        with timer.step("load_s"):
            invocations = load_invocations(workspace, "collect")
            toolsets = {inv.id: toolset_key(inv.request.messages, inv.agent)
                        for inv in invocations if inv.request.tools_source in ("inferred", "file")}
        with timer.step("scrub_s"):
            scrubbed, report = scrub_invocations(invocations, sc, workspace, progress=progress)
        stage_dir = workspace.stage_dir(STAGE)
        with timer.step("write_s"):
            files = write_shards(stage_dir, scrubbed, toolsets, set(), next_shard_no(prev))
            src_tools = workspace.stage_dir("collect") / TOOLS_FILE
            if src_tools.exists():
                write_json_atomic(stage_dir / TOOLS_FILE, json.loads(src_tools.read_text()))
                files.append(TOOLS_FILE)
            write_json_atomic(stage_dir / REPORT_FILE, report)
            files.append(REPORT_FILE)
        counts = {"invocations": len(scrubbed), "dropped_scrub_policy": report["dropped_invocations"],
                  "values_replaced": sum(e["values"] for e in report["entities"].values()),
                  "occurrences_replaced": sum(e["replaced"] for e in report["entities"].values())}
        manifest = Manifest(stage=STAGE, config_hash=config_hash, input_hash=input_hash, inputs={"collect": input_hash},
                            counts=counts, timings=timer.total(), files=files, status="ran",
                            extra={"policy": sc.policy, "surrogates": sc.surrogates,
                                   "entities": {k: {kk: v[kk] for kk in ("values", "replaced", "kept", "action")}
                                                for k, v in report["entities"].items()}})
        workspace.write_manifest(manifest)
        workspace.remove_unlisted(STAGE, manifest, SHARD_PATTERNS)
        return manifest
