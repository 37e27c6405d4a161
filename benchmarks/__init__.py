"""Speed and accuracy benchmarks: our code and a reference side by side in one run.

Each script prints ratios and writes its figures with the machine they were measured on to
`benchmarks/results/<name>.json`. See benchmarks/README.md.
"""
