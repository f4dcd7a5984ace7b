"""The mesh CA as the control plane runs it: its roots kept in the store, join tokens, node
enrolment and renewal over gRPC, and the management routes that administer them."""
