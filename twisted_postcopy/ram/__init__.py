"""ram subpackage of twisted_postcopy."""
