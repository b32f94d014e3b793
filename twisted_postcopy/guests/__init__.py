"""guests subpackage of twisted_postcopy."""
