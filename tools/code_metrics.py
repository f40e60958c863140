"""Package metrics: lines (and the app's), the largest file and the largest classes (AST spans).

python tools/code_metrics.py [lightning_prune]
"""

import ast
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "lightning_prune")
files = sorted(root.rglob("*.py"))
lines = {f: len(f.read_text().splitlines()) for f in files}
app = {
    f: n
    for f, n in lines.items()
    if "/app/" in str(f) or f.name in ("cli.py", "cli_run.py", "data.py", "models.py", "report.py")
}
print("package lines", sum(lines.values()), "of which app", sum(app.values()))
big = max(lines, key=lines.get)
print("largest file", big, lines[big])
classes = []
for f in files:
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ClassDef):
            classes.append((node.end_lineno - node.lineno + 1, f"{f}:{node.name}"))
classes.sort(reverse=True)
print("largest classes", classes[:4])
functions = []
for f in files:
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append((node.end_lineno - node.lineno + 1, f"{f}:{node.name}"))
functions.sort(reverse=True)
print("largest functions", functions[:6])
