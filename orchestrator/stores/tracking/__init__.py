"""The MLflow tracking store: one parent run per sweep, one child run per trial
(docs/design.md §5), written through a journaled background writer."""
