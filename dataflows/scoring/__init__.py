"""The serve step's logic: shards that decode and score runs, and the scored records' bytes."""
