# One copy only: imported under its bare name as well, every module here would load
# twice (two of each class, of each module-level table), so a straggler's "import registry" fails.
if __name__ != "tron.registry":
    raise ImportError(f"import tron.registry, not {__name__}: Tron's packages live under the tron namespace")
