# One copy only: imported under its bare name as well, every module here would load
# twice (two of each class, of each module-level table), so a straggler's "import scripts" fails.
if __name__ != "tron.scripts":
    raise ImportError(f"import tron.scripts, not {__name__}: Tron's packages live under the tron namespace")
