"""Rolling models out as experiments: serving plans, traffic policies, and the statistics that
promote or roll back a candidate."""
