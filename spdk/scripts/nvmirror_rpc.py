"""rpc.py plugin for nvmirror's SPDK runtime (`nvmirror spdk`).

    PYTHONPATH=spdk/scripts:$SPDK_DIR/python \
        $SPDK_DIR/scripts/rpc.py -s /var/tmp/spdk.sock --plugin nvmirror_rpc COMMAND ...

Commands: bdev_nvmirror_create, bdev_nvmirror_delete, bdev_nvmirror_get_bdevs,
nvmirror_get_stats, nvmirror_cp, nvmirror_set_policy, nvmirror_attach, nvmirror_checksum,
nvmirror_promote, nvmirror_discard_changes (the same arguments as bdev_nvmirror_create).
bdev_nvmirror_create takes the keys of a node's TOML config (role, volume, peer/listen, ...);
`--extra '{"key": value}'` passes any key the options below do not name.
"""

import json

from spdk.rpc.cmd_parser import print_json


def volume_params(args):
    """The params of bdev_nvmirror_create (also nvmirror_discard_changes) from the arguments."""
    params = {
        'name': args.name,
        'role': args.role,
        'volume': args.volume,
        'namespace': [{'kind': 'bdev', 'bdev': bdev} for bdev in args.base_bdev],
    }
    for key in ('peer', 'listen', 'ring_size_mib', 'hugepage_dir', 'fallback_dir', 'ring_medium',
                'ring_dir', 'metadata_path', 'cp_interval_ms', 'peer_timeout_ms',
                'peer_loss_policy', 'resync_rate_mib_s'):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.assume_identical:
        params['assume_identical'] = True
    if args.extra:
        params.update(json.loads(args.extra))
    return params


def bdev_nvmirror_create(args):
    print_json(args.client.call('bdev_nvmirror_create', volume_params(args)))


def nvmirror_discard_changes(args):
    print_json(args.client.call('nvmirror_discard_changes', volume_params(args)))


def nvmirror_promote(args):
    params = {'name': args.name}
    if args.peer is not None:
        params['peer'] = args.peer
    print_json(args.client.call('nvmirror_promote', params))


def bdev_nvmirror_delete(args):
    print_json(args.client.call('bdev_nvmirror_delete', {'name': args.name}))


def bdev_nvmirror_get_bdevs(args):
    params = {'name': args.name} if args.name else None
    print_json(args.client.call('bdev_nvmirror_get_bdevs', params))


def nvmirror_get_stats(args):
    print_json(args.client.call('nvmirror_get_stats', {'name': args.name}))


def nvmirror_cp(args):
    params = {'name': args.name, 'wait': args.wait}
    if args.timeout_ms is not None:
        params['timeout_ms'] = args.timeout_ms
    print_json(args.client.call('nvmirror_cp', params))


def nvmirror_set_policy(args):
    print_json(args.client.call('nvmirror_set_policy', {'name': args.name, 'policy': args.policy}))


def nvmirror_attach(args):
    print_json(args.client.call('nvmirror_attach', {'name': args.name, 'peer': args.peer}))


def nvmirror_checksum(args):
    print_json(args.client.call('nvmirror_checksum', {'name': args.name}))


def add_volume_arguments(p):
    """bdev_nvmirror_create's arguments (nvmirror_discard_changes takes the same)."""
    p.add_argument('-b', '--name', required=True, help='volume (and exported bdev) name')
    p.add_argument('-r', '--role', required=True, choices=['source', 'destination'])
    p.add_argument('--volume', required=True, help='the replicated volume both sides name')
    p.add_argument('--base-bdev', action='append', required=True,
                   help='a namespace: the primary (source) or mirror (destination) bdev; repeatable')
    p.add_argument('--peer', help="source: the destination's replication address ADDR:PORT")
    p.add_argument('--listen', help='destination: where it accepts its source, ADDR:PORT')
    p.add_argument('--ring-size-mib', type=int)
    p.add_argument('--hugepage-dir')
    p.add_argument('--fallback-dir')
    p.add_argument('--ring-medium', choices=['hugetlbfs', 'file', 'dax'])
    p.add_argument('--ring-dir')
    p.add_argument('--metadata-path')
    p.add_argument('--cp-interval-ms', type=int)
    p.add_argument('--peer-timeout-ms', type=int)
    p.add_argument('--peer-loss-policy', choices=['suspend', 'fail', 'degrade'])
    p.add_argument('--resync-rate-mib-s', type=int)
    p.add_argument('--assume-identical', action='store_true',
                   help='both devices are known identical (freshly zeroed): no initial full sync')
    p.add_argument('--extra', help='more config keys as a JSON object')


def spdk_rpc_plugin_initialize(subparsers):
    p = subparsers.add_parser('bdev_nvmirror_create',
                              help='Create an nvmirror volume: a source exports a replicated bdev')
    add_volume_arguments(p)
    p.set_defaults(func=bdev_nvmirror_create)

    p = subparsers.add_parser('nvmirror_promote',
                              help='Failover: a destination whose source is lost serves as the source')
    p.add_argument('name')
    p.add_argument('--peer', help="where the new destination will listen (default: the config's promote_peer)")
    p.set_defaults(func=nvmirror_promote)

    p = subparsers.add_parser('nvmirror_discard_changes',
                              help="After a split brain: a deleted volume's node forgets its changes "
                                   '(created again as a destination, it takes a full sync)')
    add_volume_arguments(p)
    p.set_defaults(func=nvmirror_discard_changes)

    p = subparsers.add_parser('bdev_nvmirror_delete', help='Delete an nvmirror volume')
    p.add_argument('name')
    p.set_defaults(func=bdev_nvmirror_delete)

    p = subparsers.add_parser('bdev_nvmirror_get_bdevs', help='List nvmirror volumes and their state')
    p.add_argument('-b', '--name', help='only this volume')
    p.set_defaults(func=bdev_nvmirror_get_bdevs)

    p = subparsers.add_parser('nvmirror_get_stats', help="A volume's counters")
    p.add_argument('name')
    p.set_defaults(func=nvmirror_get_stats)

    p = subparsers.add_parser('nvmirror_cp', help='Start a consistency point')
    p.add_argument('name')
    p.add_argument('--wait', action='store_true',
                   help='return once every write completed before it is on both sides')
    p.add_argument('--timeout-ms', type=int)
    p.set_defaults(func=nvmirror_cp)

    p = subparsers.add_parser('nvmirror_set_policy', help="Change a source's peer-loss policy")
    p.add_argument('name')
    p.add_argument('policy', choices=['suspend', 'fail', 'degrade'])
    p.set_defaults(func=nvmirror_set_policy)

    p = subparsers.add_parser('nvmirror_attach', help='Replicate to another destination from now on')
    p.add_argument('name')
    p.add_argument('peer', help='ADDR:PORT')
    p.set_defaults(func=nvmirror_attach)

    p = subparsers.add_parser('nvmirror_checksum',
                              help="Size and CRC32C of each of a volume's devices (primary or mirror)")
    p.add_argument('name')
    p.set_defaults(func=nvmirror_checksum)
