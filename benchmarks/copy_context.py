"""How many of the values the LLM copies into its tool calls can the SLM see? Full prompt vs compacted.

    python benchmarks/copy_context.py --workspace WS                  # a workspace after collect + cluster
    python benchmarks/copy_context.py [--log ../shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json]

For every tool call of the test split, each argument value of 3+ characters the LLM wrote is looked for
verbatim in (a) the full prompt and (b) the prompt as the SLM gets it — compacted with the recipe
finetune would fit on the train split, at several history windows, with and without carried values
(`compaction.carry_values`), carried most recent first or the most copied keys first (`compaction.carry_order`), and with the
dropped tool calls named (`compaction.carry_calls`). A value that is not in the
SLM's prompt can only be guessed. Keys to carry
are learned on the train split only. Prints one row per setting; ~1 minute after collect + cluster.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def _text(msgs) -> str:
    out = []
    for m in msgs:
        c = m.get("content")
        out.append(c if isinstance(c, str) else json.dumps(c, ensure_ascii=False))
        out += [json.dumps(tc, ensure_ascii=False) for tc in m.get("tool_calls") or []]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default=None, help="a workspace after collect + cluster (else one is made from --log)")
    ap.add_argument("--log", default=str(DEFAULT))
    ap.add_argument("--windows", default="640,1536,3072", help="compaction.max_history_tokens values")
    ap.add_argument("--tool-result-chars", type=int, default=600)
    ap.add_argument("--carry", type=int, default=24)
    ap.add_argument("--calls", type=int, default=12, help="compaction.carry_calls")
    args = ap.parse_args()

    from slmconvert.cluster.stage import load_assignments
    from slmconvert.compaction import compact, fit_recipe
    from slmconvert.config import load_config
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    ws_path = args.workspace
    if ws_path is None:
        from slmconvert.cluster.stage import run as cluster
        from slmconvert.collect.stage import run as collect

        ws_path = str(Path(tempfile.mkdtemp()) / "ws")
        cfg = load_config(None, [f"workspace={json.dumps(ws_path)}", f"collect.paths={json.dumps([args.log])}"])
        collect(cfg, Workspace(ws_path))
        cluster(cfg, Workspace(ws_path))
    ws = Workspace(ws_path)
    by_id = {i.id: i for i in load_invocations(ws, "collect")}
    sites: dict[str, dict[str, list]] = {}
    for a in load_assignments(ws):
        inv = by_id.get(a["invocation_id"])
        if inv is not None:
            sites.setdefault(a["site"], {"train": [], "test": []})["train" if a["split"] == "train" else "test"].append(inv)
    print(f"{'site':24s} {'window':>7s} {'carry':>5s} {'order':>7s} {'calls':>5s} {'values':>6s} {'in full prompt':>15s} {'in SLM prompt':>14s} {'prompt chars':>12s}  keys carried")
    for site, s in sorted(sites.items()):
        calls = [i for i in s["test"] if i.response.tool_calls]
        for window in (int(w) for w in args.windows.split(",")):
            for carry, order, named in ((0, "-", 0), (args.carry, "recent", 0), (args.carry, "copied", 0), (args.carry, "copied", args.calls)):
                recipe = fit_recipe([i.request.messages for i in s["train"] + s["test"]], max_history_tokens=window,
                                    max_tool_result_chars=args.tool_result_chars,
                                    toolsets=[i.request.tools for i in s["train"] + s["test"]],
                                    copy_examples=[(i.request.messages, i.response.tool_calls) for i in s["train"]],
                                    max_carried=carry, carry_calls=named, carry_order="copied" if order == "copied" else "recent")
                n = full = seen = chars = 0
                for inv in calls:
                    whole, slm = _text(inv.request.messages), _text(compact(inv.request.messages, recipe))
                    chars += len(slm)
                    for c in inv.response.tool_calls:
                        for v in (c.arguments or {}).values():
                            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and len(str(v)) >= 3:
                                n += 1
                                full += str(v) in whole
                                seen += str(v) in slm
                if n:
                    print(f"{site[:24]:24s} {window:7d} {carry:5d} {order:>7s} {named:5d} {n:6d} {full / n:15.1%} {seen / n:14.1%} "
                          f"{chars // max(1, len(calls)):12d}  {', '.join(recipe.carry_keys or []) or '-'}")


if __name__ == "__main__":
    main()
