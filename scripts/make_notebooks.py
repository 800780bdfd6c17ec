"""Write notebooks/<name>.ipynb: one per paper table, each regenerating the table from run directories with the
paper's numbers beside ours. The notebooks are committed; rerun this after changing the template.

    python scripts/make_notebooks.py
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent

NOTEBOOKS = {
    "flowmm_table1": dict(
        title="FlowMM Table 1: MileBench, seven tasks, 20% KV budget",
        ref="FlowMM (arXiv 2511.05534), Table 1; efficiency from its Table 2",
        experiments=["flowmm_table1"], paper="flowmm_table1", efficiency="flowmm_table2_4",
        paper_model="Qwen2.5-VL-7B"),
    "madakv_table1": dict(
        title="MadaKV main table: MileBench, 20% KV budget",
        ref="MadaKV (ACL 2025, arXiv 2506.15724), Tables 1-2 as a secondary note reports them",
        experiments=["madakv_table1"], paper="madakv_table1", efficiency="madakv_table1",
        paper_model="LLaVA-v1.5-7B"),
    "audiokv_table1": dict(
        title="AudioKV Table 1: ASR and speech translation at KV retention 0.8 / 0.6 / 0.4",
        ref="AudioKV (arXiv 2604.06694), Table 1: KeSpeech (100 - CER), LibriSpeech-long, MLS fr/de/es "
            "(100 - WER), CoVoST 2 en->zh (chrF) and zh->en (BLEU)",
        experiments=["audiokv_table1"], paper="audiokv_table1", efficiency=None, paper_model="Qwen2.5-Omni-7B"),
    "audiokv_table2": dict(
        title="AudioKV Table 2: spoken QA at a 40% KV budget, LLM-judged",
        ref="AudioKV (arXiv 2604.06694), Table 2: the four UltraEval-Audio sets, binary judge correctness (scores "
            "stay pending until a judge endpoint is set; python -m avkv.judge judges the run directories)",
        experiments=["audiokv_table2"], paper="audiokv_table2", efficiency=None, paper_model="Qwen2.5-Omni-7B"),
    "acckv_tables4_5": dict(
        title="AccKV Tables 4-5: MVBench (ten audio-bearing tasks) and AVSD at 20% / 10% KV",
        ref="AccKV (AAAI 2026, arXiv 2511.11106), Tables 4-5; no per-cell numbers were found, so the paper "
            "columns stay empty",
        experiments=["acckv_table4", "acckv_table5"], paper="acckv_tables4_5", efficiency=None,
        paper_model="VideoLLaMA2-AV"),
    "purekv": dict(
        title="PureKV: video understanding at 10% / 20% KV",
        ref="PureKV (arXiv 2510.25600); only the abstract's claims were found (5.0x KV compression, 3.16x prefill)",
        experiments=["purekv"], paper="purekv", efficiency=None, paper_model="Qwen2.5-VL-7B"),
    "budget_curves": dict(
        title="Budget curves: score, KV memory and decode latency vs budget",
        ref="avkv's own sweep (budgets as in FlowMM Fig. 4 and MadaKV's sweep)",
        experiments=["budget_curves"], paper=None, efficiency=None, paper_model=None),
}


def notebook(name: str, spec: dict) -> nbformat.NotebookNode:
    exps = spec["experiments"]
    cmds = "\n".join(f"python run.py -m experiment={e} smoke=tiny            # tiny models + fixtures\n"
                     f"python run.py -m experiment={e} hydra/launcher=slurm dataset.root=... model.path=..."
                     for e in exps)
    cells = [
        new_markdown_cell(
            f"# {spec['title']}\n\n"
            f"Source: {spec['ref']}. Paper numbers: `results/papers/{spec['paper'] or '-'}.csv`.\n\n"
            "This notebook rebuilds the table from the run directories (`samples.jsonl` of every run; the files are "
            "the ground truth, W&B only mirrors them). Each cell is `mean ± half-width` of a bootstrap 95% "
            "interval; `Δ Full` is the paired difference against the full cache on the same samples. At smoke scale "
            "(tiny random-weight models, two fixture samples) the numbers only show that the pipeline works.\n\n"
            f"Produce the runs with\n\n```\n{cmds}\n```\n\nthen run all cells (set `RUNS` below if `paths.runs` "
            "was changed)."),
        new_code_cell(
            "# parameters\n"
            'RUNS = "../runs"                 # where run.py wrote (paths.runs), or any folder of run directories\n'
            f"EXPERIMENTS = {exps!r}\n"
            f"PAPER = {spec['paper']!r}       # results/papers/<PAPER>.csv\n"
            f"EFFICIENCY_PAPER = {spec['efficiency']!r}\n"
            f"PAPER_MODEL = {spec['paper_model']!r}\n"
            f'OUT = "../reports/{name}"       # tables, parquet and plots are written here too\n'
            "N_BOOT = 2000",
            metadata={"tags": ["parameters"]}),
        new_code_cell(
            "import sys\nfrom pathlib import Path\n\n"
            "ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / 'avkv' / 'report' / '__init__.py').is_file())\n"
            "sys.path.insert(0, str(ROOT))\n\n"
            "import pandas as pd\nfrom IPython.display import Image, Markdown, display\n\nfrom avkv import report\n\n"
            "show = lambda t: display(Markdown(report.to_markdown(t)))\n"
            "runs = Path(RUNS) if Path(RUNS).is_absolute() else (Path.cwd() / RUNS).resolve()\n"
            "df = report.collect([runs])\n"
            "if len(df):\n"
            "    df = df[df['experiment'].isin(EXPERIMENTS)]\n"
            "points = report.aggregate(df, n_boot=N_BOOT)\n"
            "avg = report.average_over_tasks(df, n_boot=N_BOOT)\n"
            "print(f\"{runs}: {df['run_dir'].nunique() if len(df) else 0} runs, {int(df['sample_id'].notna().sum()) "
            "if len(df) else 0} samples of {EXPERIMENTS}\")\n"
            "if len(df):\n"
            "    report.write_samples(df, Path(OUT))\n"
            "    points.to_csv(Path(OUT) / 'points.csv', index=False)"),
        new_markdown_cell("## Our table"),
        new_code_cell(
            "if points.empty:\n"
            "    print('no runs yet: run the commands above')\n"
            "for (exp, ds), p in (points.groupby(['experiment', 'dataset'], sort=False) if len(points) else []):\n"
            "    a = avg[(avg['experiment'] == exp) & (avg['dataset'] == ds)]\n"
            "    display(Markdown(f'### {exp} · {ds}'))\n"
            "    show(report.wide_table(p, a))"),
    ]
    if spec["paper"]:
        cells += [
            new_markdown_cell("## The paper's numbers, as published"),
            new_code_cell("paper = report.paper_numbers(PAPER)\nprint(', '.join(sorted(set(paper['ref']))))\n"
                          "show(report.paper_table(paper))"),
            new_markdown_cell(
                "## Ours beside the paper\n\nCells are `ours ± CI (paper)`; the paper's row set and task order. "
                "Rows the paper does not have (or methods not run yet) show `–`."),
            new_code_cell("show(report.beside_paper(points, avg, paper, paper_model=PAPER_MODEL))"),
        ]
    cells += [
        new_markdown_cell("## Efficiency: KV memory kept and decode latency"),
        new_code_cell(
            "eff_paper = report.paper_numbers(EFFICIENCY_PAPER) if EFFICIENCY_PAPER else None\n"
            "show(report.efficiency_beside(points, eff_paper))"),
        new_markdown_cell("## Budget curves"),
        new_code_cell(
            "for png in report.plot_budget_curves(points, Path(OUT) / 'plots', avg):\n"
            "    display(Image(filename=str(png)))"),
        new_markdown_cell("## Completeness\n\nPoints with a missing shard or an unfinished run (rerun the same "
                          "command, or `avkv missing experiment=... ` for the exact resubmission)."),
        new_code_cell(
            "cols = ['experiment', 'model', 'method', 'budget', 'task', 'score_n', 'n_err', 'shards_seen', "
            "'num_shards', 'complete']\n"
            "show(points[~points['complete']][cols] if len(points) else pd.DataFrame(columns=cols))"),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    out = ROOT / "notebooks"
    out.mkdir(exist_ok=True)
    for name, spec in NOTEBOOKS.items():
        nbformat.write(notebook(name, spec), out / f"{name}.ipynb")
        print(out / f"{name}.ipynb")


if __name__ == "__main__":
    main()
