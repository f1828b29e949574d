"""`dynpose-eval`: keypoint AP/AR (COCO, CrowdPose and COCO-format sets) or MPII PCKh of a results file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dynpose.cli.common import setup_logging, user_errors, version_option
from dynpose.errors import DynPoseError
from dynpose.fileio import OutputGuard, write_json_atomic


def _gt_is_mpii(gt: Path) -> bool:
    """MPII annotations are a JSON list; COCO-format ones a dict. Peek at the first character to tell them apart."""
    if not gt.is_file():
        raise DynPoseError(f"ground truth {gt}: file not found")
    with open(gt, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def run_eval(gt: str | Path, results: str | Path, kind: str = "auto", verbose: bool = False) -> dict[str, Any]:
    """Dispatch to COCO-style AP or MPII PCKh by `kind` (auto: a JSON list of records is MPII)."""
    gt = Path(gt)
    if kind == "mpii" or (kind == "auto" and _gt_is_mpii(gt)):
        from dynpose.eval.mpii import pckh

        return pckh(results, gt)
    from dynpose.eval.coco import evaluate_results

    return evaluate_results(results, gt, kind=kind, verbose=verbose)


def format_table(res: dict[str, Any]) -> Table:
    """One metric per row, so the table fits a narrow terminal or a CI log."""
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    pct = res["kind"] == "mpii"
    for n, v in zip(res["names"], res["stats"], strict=True):
        table.add_row(n, f"{v:.2f}" if pct else f"{v:.3f}")
    return table


EPILOG = """\b
Examples:
  dynpose-eval --gt person_keypoints_val2017.json --results results.json
  dynpose-eval --gt crowdpose_test.json --results results.json --json crowdpose_ap.json
  dynpose-eval --gt mpii/annot/valid.json --results preds.npy --kind mpii

\b
Results: COCO result records [{image_id, category_id, keypoints [x,y,s]*K, score}, ...], or the .jsonl dynpose-run writes.
MPII predictions: (N,16,2) joints in annotation order, as .npy or a JSON list (or {"preds": ...}).
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@version_option
@click.option(
    "--gt", "gt", required=True, type=click.Path(path_type=Path), help="Annotation file (COCO format or MPII JSON)."
)
@click.option("--results", required=True, type=click.Path(path_type=Path), help="Results / predictions file.")
@click.option(
    "--kind",
    type=click.Choice(["auto", "coco", "crowdpose", "mpii"]),
    default="auto",
    show_default=True,
    help="Metric; auto picks by the annotation file (17 kpts: COCO, 14: CrowdPose, JSON list: MPII).",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the figures to this JSON file.")
@click.option("-v", "--verbose", is_flag=True, help="Show pycocotools' own output.")
@user_errors
def main(gt: Path, results: Path, kind: str, json_out: Path | None, verbose: bool) -> None:
    """Score pose results: COCO keypoint AP/AR via pycocotools (COCO, OCHuman, HumanArt; CrowdPose with its own
    sigmas and easy/medium/hard split) or MPII PCKh@0.5 / @0.1."""
    setup_logging()
    OutputGuard.of({"--gt": gt, "--results": results}).check_file(json_out, "--json")
    res = run_eval(gt, results, kind, verbose)
    title = {"coco": "COCO keypoint AP/AR", "crowdpose": "CrowdPose AP/AR", "mpii": f"MPII PCKh@{res.get('thr', 0.5)}"}
    click.echo(f"{title[res['kind']]}: {results}")
    Console().print(format_table(res))
    if json_out is not None:
        write_json_atomic(json_out, res | {"gt": str(gt), "results": str(results)})
        click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    main()
