"""mesh.lb: kernel load balancing (nftables, IPVS) behind service VIPs and published ports
(installed as `mesh.lb`; the folder is lb/ in the repository). It never imports mesh.dns.
"""
