"""What operators read: status, verify, metrics."""
