//! vhost-user-vsock backend: the agent terminates the guest's vsock connections itself.
