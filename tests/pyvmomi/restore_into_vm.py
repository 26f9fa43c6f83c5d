"""The vim25 calls ferry makes for a restore into a VM, made by pyvmomi (VMware's own
Python binding) against ferry's mock vCenter, so that the mock's answers are
checked by a real client's deserializer: property reads (power state, datastore
summary and host mounts, disks), ReconfigVM_Task adding a new disk on a chosen
datastore under a storage policy (VirtualMachineDefinedProfileSpec) and encrypted
under the VM's key, its removal with fileOperation=destroy, the FileLocked fault
on a hot-add and on a write ticket of a locked file, and InvalidPowerState from
the power tasks.

Run by tests/vsphere_pyvmomi.rs with one JSON argument; prints one JSON object.
"""

import json
import ssl
import sys
import time

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim


def wait(task, timeout=60):
    """Poll a task (pyvmomi's WaitForTask type-checks entities; polling is
    what ferry does too) and return its info."""
    deadline = time.time() + timeout
    while True:
        info = task.info
        if info.state in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            return info
        if time.time() > deadline:
            raise RuntimeError("task %s did not finish" % info.key)
        time.sleep(0.05)


def fault_of(info):
    err = info.error
    return {
        "type": type(err).__name__.rsplit(".", 1)[-1],
        "is_file_locked": isinstance(err, vim.fault.FileLocked),
        "is_invalid_power_state": isinstance(err, vim.fault.InvalidPowerState),
        "file": getattr(err, "file", None),
        "msg": err.msg,
    }


def main():
    a = json.loads(sys.argv[1])
    ctx = ssl.create_default_context(cafile=a["ca"])
    si = SmartConnect(
        host="127.0.0.1", port=a["port"], user=a["user"], pwd=a["password"], sslContext=ctx
    )
    out = {}
    try:
        content = si.RetrieveContent()
        vms = {
            v.name: v
            for v in content.viewManager.CreateContainerView(
                content.rootFolder, [vim.VirtualMachine], True
            ).view
        }
        dss = {
            d.name: d
            for d in content.viewManager.CreateContainerView(
                content.rootFolder, [vim.Datastore], True
            ).view
        }
        target = vms[a["target"]]
        off = vms[a["powered_off"]]
        proxy = vms[a["proxy"]]

        # What ferry reads before any change.
        out["power"] = {
            n: str(vms[n].runtime.powerState) for n in (a["target"], a["powered_off"])
        }
        host = target.runtime.host
        out["host_datastores"] = sorted(d.name for d in host.datastore)
        ds = dss[a["datastore"]]
        out["datastore"] = {
            "name": ds.summary.name,
            "capacity": ds.summary.capacity,
            "free_space": ds.summary.freeSpace,
            "accessible": ds.summary.accessible,
            "mounted_on": sorted(m.key.name for m in ds.host),
        }
        key_id = target.config.keyId
        out["vm_key_provider"] = key_id.providerId.id if key_id else None

        # ReconfigVM_Task: a new disk on the chosen datastore, under a storage
        # policy and the VM's key, exactly as ferry's create_disk_change builds it.
        file_name = "[%s] %s/ferry-restore-pyvmomi-disk0.vmdk" % (a["datastore"], a["target"])
        dev = vim.vm.device.VirtualDisk(
            key=-200,
            controllerKey=1000,
            capacityInKB=1024,
            capacityInBytes=1 << 20,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=file_name, datastore=ds, diskMode="persistent", thinProvisioned=True
            ),
        )
        change = vim.vm.device.VirtualDeviceSpec(
            operation="add",
            fileOperation="create",
            device=dev,
            profile=[vim.vm.DefinedProfileSpec(profileId=a["policy"])],
        )
        if key_id:
            change.backing = vim.vm.device.VirtualDeviceSpec.BackingSpec(
                crypto=vim.encryption.CryptoSpecEncrypt(cryptoKeyId=key_id)
            )
        info = wait(target.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))
        out["create"] = str(info.state)
        if info.state == vim.TaskInfo.State.error:
            out["create_fault"] = fault_of(info)
        new = [
            d
            for d in target.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk) and d.backing.fileName == file_name
        ]
        out["new_disk"] = (
            {
                "key": new[0].key,
                "file": new[0].backing.fileName,
                "datastore": new[0].backing.datastore.name,
                "capacity": new[0].capacityInBytes,
                "encrypted_under": new[0].backing.keyId.providerId.id
                if new[0].backing.keyId
                else None,
            }
            if new
            else None
        )

        # FileLocked: hot-adding the locked file to the proxy (ReconfigVM task
        # error) and a write ticket for it (a SOAP fault).
        locked = vim.vm.device.VirtualDeviceSpec(
            operation="add",
            device=vim.vm.device.VirtualDisk(
                key=-201,
                controllerKey=1000,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=a["locked_file"], diskMode="independent_persistent"
                ),
            ),
        )
        info = wait(proxy.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[locked])))
        out["hotadd_locked"] = fault_of(info) if info.error else str(info.state)
        try:
            content.sessionManager.AcquireGenericServiceTicket(
                spec=vim.SessionManager.HttpServiceRequestSpec(
                    method="httpPut",
                    url="nbd://%s/%s/%d"
                    % (off.runtime.host._moId, off._moId, a["locked_key"]),
                )
            )
            out["ticket_locked"] = "granted"
        except vim.fault.FileLocked as e:
            out["ticket_locked"] = {"type": type(e).__name__.rsplit(".", 1)[-1], "file": e.file, "msg": e.msg}

        # Power tasks: off is already off (InvalidPowerState), on then off again.
        out["power_off_again"] = fault_of(wait(off.PowerOffVM_Task()))
        out["power_on"] = str(wait(off.PowerOnVM_Task()).state)
        out["power_after_on"] = str(off.runtime.powerState)
        out["power_off"] = str(wait(off.PowerOffVM_Task()).state)

        # Cleanup as ferry's sweep does it: remove with fileOperation=destroy.
        if new:
            gone = vim.vm.device.VirtualDeviceSpec(
                operation="remove", fileOperation="destroy", device=new[0]
            )
            out["destroy"] = str(
                wait(target.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[gone]))).state
            )
            out["left"] = [
                d.backing.fileName
                for d in target.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk) and d.backing.fileName == file_name
            ]
    finally:
        Disconnect(si)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
