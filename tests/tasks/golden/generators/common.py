"""Shared helpers for the golden generators (avkv issue 14). Run OUTSIDE the avkv repository."""
import ast, json, subprocess
from pathlib import Path

OUT = Path("/work/wt/i14-scorers/tests/tasks/golden")
OFFICIAL = Path("/work/scratch14/official")


def commit_of(mirror: str, rev: str = "HEAD") -> str:
    return subprocess.check_output(["git", "-C", f"/work/.mirror/{mirror}/repo", "rev-parse", rev], text=True).strip()


def load_function(path: Path, name: str, namespace: dict) -> object:
    """Execute ONE top-level function of an official file, unmodified, in `namespace` (the file's other
    imports — torch, decord, model code — are not needed to run it)."""
    src = Path(path).read_text()
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            code = ast.get_source_segment(src, node)
            exec(compile(code, str(path), "exec"), namespace)
            return namespace[name]
    raise KeyError(name)


def write(name: str, payload: dict) -> None:
    p = OUT / name
    p.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", p, len(payload.get("cases", [])), "cases")
