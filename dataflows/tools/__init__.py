"""The `waxserve` command line, the demo, the embedded broker and the recovery-store setup."""
