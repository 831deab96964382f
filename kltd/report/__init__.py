"""What runs leave behind and how they are compared: the logger and W&B, run records, aggregation, tables, plots."""
