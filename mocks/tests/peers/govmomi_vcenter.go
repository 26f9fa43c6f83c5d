// govmomi (VMware's Go SDK, from Debian's golang-github-vmware-govmomi-dev) against
// ferry's mock vCenter: login, inventory through container views, snapshots waited
// with govmomi's own task waiter (CreatePropertyCollector + WaitForUpdatesEx),
// QueryChangedDiskAreas, hot-add refused across key providers and accepted within
// one, detach, snapshot removal, logout. Driven by mocks/tests/vcenter_govmomi.rs:
// argument 1 is the SDK URL, 2 the user, 3 the password, 4 the CA file. Prints a
// JSON summary on success; exits 1 with a message on any failure.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/task"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

func check(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", what, err)
		os.Exit(1)
	}
}

func expect(ok bool, what string) {
	if !ok {
		fmt.Fprintf(os.Stderr, "FAIL %s\n", what)
		os.Exit(1)
	}
}

func firstDisk(devs []types.BaseVirtualDevice) *types.VirtualDisk {
	for _, d := range devs {
		if disk, ok := d.(*types.VirtualDisk); ok {
			return disk
		}
	}
	return nil
}

func main() {
	ctx := context.Background()
	u, err := url.Parse(os.Args[1])
	check(err, "url")
	sc := soap.NewClient(u, false)
	check(sc.SetRootCAs(os.Args[4]), "CA")
	vc, err := vim25.NewClient(ctx, sc)
	check(err, "vim25 client")
	c := &govmomi.Client{Client: vc, SessionManager: session.NewManager(vc)}
	check(c.Login(ctx, url.UserPassword(os.Args[2], os.Args[3])), "login")
	summary := map[string]interface{}{"api": c.ServiceContent.About.ApiVersion}

	m := view.NewManager(c.Client)
	v, err := m.CreateContainerView(ctx, c.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	check(err, "container view")
	var vms []mo.VirtualMachine
	check(v.Retrieve(ctx, []string{"VirtualMachine"}, []string{"name", "config", "runtime.host", "datastore"}, &vms), "retrieve VMs")
	check(v.Destroy(ctx), "destroy view")
	byName := map[string]mo.VirtualMachine{}
	providers := map[string]string{}
	for _, vm := range vms {
		byName[vm.Name] = vm
		if vm.Config.KeyId != nil {
			providers[vm.Name] = vm.Config.KeyId.ProviderId.Id
		}
		disk := firstDisk(vm.Config.Hardware.Device)
		expect(disk != nil, vm.Name+" has a disk")
		_, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		expect(ok, "flat ver2 backing")
	}
	summary["vms"] = len(vms)
	summary["providers"] = providers

	hv, err := m.CreateContainerView(ctx, c.ServiceContent.RootFolder, []string{"HostSystem"}, true)
	check(err, "host view")
	var hosts []mo.HostSystem
	check(hv.Retrieve(ctx, []string{"HostSystem"}, []string{"name", "datastore", "parent"}, &hosts), "retrieve hosts")
	summary["hosts"] = len(hosts)

	pc := property.DefaultCollector(c.Client)
	snapshot := func(name string) (*object.VirtualMachine, types.ManagedObjectReference, *types.VirtualDisk) {
		vm := object.NewVirtualMachine(c.Client, byName[name].Self)
		t, err := vm.CreateSnapshot(ctx, "ferry-go", "ferry backup (govmomi)", false, false)
		check(err, "CreateSnapshot_Task")
		info, err := t.WaitForResult(ctx, nil)
		check(err, "wait for snapshot")
		ref := info.Result.(types.ManagedObjectReference)
		var s mo.VirtualMachineSnapshot
		check(pc.RetrieveOne(ctx, ref, []string{"config"}, &s), "snapshot config")
		return vm, ref, firstDisk(s.Config.Hardware.Device)
	}
	web, webSnap, webDisk := snapshot("tenant-a-web")
	db, dbSnap, dbDisk := snapshot("tenant-b-db")

	var allocated int64
	for start := int64(0); start < webDisk.CapacityInBytes; {
		req := types.QueryChangedDiskAreas{This: web.Reference(), Snapshot: &webSnap, DeviceKey: webDisk.Key, StartOffset: start, ChangeId: "*"}
		res, err := methods.QueryChangedDiskAreas(ctx, c.Client, &req)
		check(err, "QueryChangedDiskAreas")
		for _, a := range res.Returnval.ChangedArea {
			allocated += a.Length
		}
		start = res.Returnval.StartOffset + res.Returnval.Length
	}
	summary["allocated"] = allocated
	req := types.QueryChangedDiskAreas{This: web.Reference(), Snapshot: &webSnap, DeviceKey: webDisk.Key, ChangeId: "bogus/1"}
	_, err = methods.QueryChangedDiskAreas(ctx, c.Client, &req)
	expect(err != nil && soap.IsSoapFault(err), "unknown changeId is a SOAP fault")
	_, isFileFault := soap.ToSoapFault(err).VimFault().(types.FileFault)
	expect(isFileFault, "unknown changeId is a FileFault")

	proxy := object.NewVirtualMachine(c.Client, byName["proxy-a"].Self)
	hotAdd := func(d *types.VirtualDisk) error {
		b := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		spec := types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd,
			Device: &types.VirtualDisk{VirtualDevice: types.VirtualDevice{Key: -1, ControllerKey: 1000,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: b.FileName},
					DiskMode:                     "independent_nonpersistent"}}},
		}}}
		t, err := proxy.Reconfigure(ctx, spec)
		check(err, "ReconfigVM_Task")
		return t.Wait(ctx)
	}
	err = hotAdd(dbDisk)
	expect(err != nil, "hot-add across key providers is refused")
	terr, ok := err.(task.Error)
	expect(ok, "the refusal is a task error")
	_, crypto := terr.Fault().(*types.GenericVmConfigFault)
	expect(crypto, "a GenericVmConfigFault")
	expect(strings.Contains(terr.Error(), "key providers differ"), terr.Error())
	summary["cross_kms"] = terr.Error()
	check(hotAdd(webDisk), "hot-add within one key provider")

	var p mo.VirtualMachine
	check(pc.RetrieveOne(ctx, proxy.Reference(), []string{"config.hardware.device"}, &p), "proxy devices")
	var attached *types.VirtualDisk
	for _, d := range p.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok && disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).DiskMode == "independent_nonpersistent" {
			attached = disk
		}
	}
	expect(attached != nil, "the proxy shows the hot-added disk")
	summary["attached_key"] = attached.Key
	spec := types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{
		Operation: types.VirtualDeviceConfigSpecOperationRemove, Device: attached}}}
	t, err := proxy.Reconfigure(ctx, spec)
	check(err, "detach")
	check(t.Wait(ctx), "detach task")

	for _, x := range []struct {
		vm  *object.VirtualMachine
		ref types.ManagedObjectReference
	}{{web, webSnap}, {db, dbSnap}} {
		t, err := x.vm.RemoveSnapshot(ctx, x.ref.Value, false, nil)
		check(err, "RemoveSnapshot_Task")
		check(t.Wait(ctx), "snapshot removal")
	}
	check(c.Logout(ctx), "logout")
	out, _ := json.Marshal(summary)
	fmt.Println(string(out))
}
