import ast, sys
def per_image(path):
    out = {}
    for ln in open(path):
        parts = ln.split(' ', 1)
        if len(parts) == 2 and parts[0].isdigit() and parts[1].startswith('{'):
            out[int(parts[0])] = ast.literal_eval(parts[1])   # our own run's output file, parsed as a literal
    return out
a, b = per_image(sys.argv[1]), per_image(sys.argv[2])
print(len(a), len(b), sum(1 for k in a if a[k]['ROUGE_L'] == b[k]['ROUGE_L']))
import statistics
print(statistics.fmean(v['ROUGE_L'] for v in a.values()))
