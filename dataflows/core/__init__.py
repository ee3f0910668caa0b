"""The pieces every concern shares: settings, reasons, events, records and model descriptors."""
