"""mesh.dns: the embedded DNS resolver (installed as `mesh.dns`; the folder is dns/ in the repository).

Not a module named like dnspython's (`resolver`, `zone`, `message`, `query`, `name`, `version`), so that
`import dns` keeps meaning dnspython. The resolver itself arrives with the embedded-DNS issue; sandboxes
on user-defined networks are marked for it by `mesh.state.TaskState.embedded_dns`.
"""
