"""The small core every stage stands on: errors, files (atomic writes, paths kept inside --out),
runs (the rerun lifecycle), config (a job's flags declared once), executor (local and Ray).
"""
