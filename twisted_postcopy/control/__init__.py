"""control subpackage of twisted_postcopy."""
